"""raypath: learning-rate path switching on Ray."""
