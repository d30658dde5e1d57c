"""mirror-actors: supervised QUIC links that keep a database mirror connected to its sources."""
