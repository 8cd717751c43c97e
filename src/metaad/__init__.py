"""metaad: offline visual anomaly detection and localization for industrial inspection."""

__version__ = "0.1.0"
