"""Images in, activation vectors out: image sources, the network, which positions a harvest keeps,
the harvest itself and the sharded store it writes (with the batch streams training reads)."""
