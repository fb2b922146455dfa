"""Every Redis key of the workserver, built in one place."""
