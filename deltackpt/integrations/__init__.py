"""Integrations with training loops and frameworks. The core package never imports these."""
