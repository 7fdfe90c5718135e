"""netmesh agent."""
