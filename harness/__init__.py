"""The composition root: config, wiring firmware to drivers, the CLI,
process supervision, fault injectors, the console client, the pytest plugin."""
