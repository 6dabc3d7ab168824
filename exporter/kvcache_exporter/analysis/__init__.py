"""What the collector's numbers mean over time: anomalies, trends, access patterns, what-if."""
