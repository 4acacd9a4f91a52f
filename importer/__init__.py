"""Bulk importer of DigitalOcean custom images."""
