"""Load generators and reports for measuring chatgate (and peers) as ratios within one run."""
