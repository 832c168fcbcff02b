"""NBD (Network Block Device): the host port.

protocol.py declares the wire format once; server.py serves a
hal.host.HostTarget to NBD clients (qemu, nbdkit's tools, fio, the kernel);
client.py is an asyncio client and the ``nbd://`` / ``nbd+unix://`` device
driver.
"""
