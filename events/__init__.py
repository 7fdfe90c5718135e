"""netmesh events."""
