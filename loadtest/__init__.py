"""Load tests: locust users for the daemon, a harness that runs them per validator design, a report."""
