"""The control plane's keys: release signing (TUF-style roles) and the device certificate authority."""
