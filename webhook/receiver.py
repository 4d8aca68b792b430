"""PLACEHOLDER: being written."""

from flask import Blueprint

bp = Blueprint("receiver", __name__)
