"""Sans-IO protocol cores: bytes in, events out. Nothing here imports trio, sockets or tele."""
