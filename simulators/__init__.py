"""Simulated meters, concentrators and billing systems, built on ``protocols`` only (never on ``gateway``)."""
