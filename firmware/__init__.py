"""Controller logic. Imports only the standard library, construct, bitarray and hal interface modules."""
