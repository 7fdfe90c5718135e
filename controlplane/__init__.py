"""netmesh controlplane."""
