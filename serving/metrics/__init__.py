"""Counters as plain data (`statistics`), and the Prometheus exporter that reads them."""
