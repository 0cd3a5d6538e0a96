"""The clipconv application: sessions, run folders, Table 2, reports, plots, benchmarks and the command line.

Built on the library (`clipconv`), which never imports it."""
