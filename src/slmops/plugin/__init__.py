"""The plugin machinery: the hook specs, the roles plugins register, what they provide, and the manager that loads them."""
