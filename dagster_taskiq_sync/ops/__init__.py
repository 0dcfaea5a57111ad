"""What operators use: queue admin, IAM policies, the local endpoint, metrics, the health server,
and scale-in protection.
"""
