"""The server: a supervisor over SET processes, their ledgers and journals, the control API."""
