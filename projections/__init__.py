"""netmesh projections."""
