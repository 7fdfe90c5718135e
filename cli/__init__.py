"""netmesh cli."""
