"""Identity: ed25519 key pairs, key-list files, message signatures."""
