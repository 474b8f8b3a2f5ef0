"""Test harnesses and doubles: real processes (servers, brokers, agents) and crafted artifacts."""
