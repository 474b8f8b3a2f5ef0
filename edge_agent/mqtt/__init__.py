"""The agent's side of MQTT: desired state in; state, events and telemetry out, spooled across outages."""
