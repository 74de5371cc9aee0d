"""pesto: the client of the control socket of a running pasta or passt (-c PATH)."""
