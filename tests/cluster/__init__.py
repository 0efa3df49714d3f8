"""Cluster tests (issue 13): the deploy/ topology as local processes (harness.py), its files checked
(test_deploy.py), broken one fault at a time under load (test_faults.py)."""
