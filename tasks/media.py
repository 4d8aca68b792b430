"""PLACEHOLDER: the download and reconcile tasks are being written."""
