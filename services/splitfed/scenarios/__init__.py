"""Scenarios start the roles of one way of training, wait for them and collect the results."""
