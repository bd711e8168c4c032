"""HTTP front end of the grafting service."""
