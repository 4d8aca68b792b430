"""PLACEHOLDER: being written."""

from flask import Blueprint

bp = Blueprint("archive", __name__)
