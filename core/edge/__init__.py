"""The trio edge: listeners, the two sides' connections, byte I/O, deadlines, transports, workers."""
