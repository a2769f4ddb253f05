"""Metrics: zACC, gACC, pACC, their spread across clients, the participation gap."""
