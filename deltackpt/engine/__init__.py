"""Saving and loading: the policy, retention rules, the step encoder, staging, the reconstructor."""
