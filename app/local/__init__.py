"""Running the system on one machine: the smoke run, process handling, network namespaces."""
