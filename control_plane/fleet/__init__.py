"""The control plane's side of MQTT: the broker it embeds or configures, device credentials on
the broker, the desired-state publisher and the ingest of device messages."""
