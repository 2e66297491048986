"""What every process of the gateway shares: reading settings and setting up logs."""
