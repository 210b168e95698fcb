"""Workflow modules loaded through ``KITCHEN_WORKFLOW_MODULES`` by the registry tests."""
