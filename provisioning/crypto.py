"""Secrets: generation and encryption at rest."""

import base64
import hashlib
import secrets
import string
from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings

PASSWORD_ALPHABET = string.ascii_letters + string.digits
PASSWORD_LENGTH = 32


def generate_password(length: int = PASSWORD_LENGTH) -> str:
    """Letters and digits only: safe unquoted in config files, shells and URIs."""
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(length))


@cache
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    # Any string works as a key: it is stretched to Fernet's 32 bytes with SHA-256.
    return MultiFernet([Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest())) for key in keys])


def encrypt(plaintext: str) -> str:
    return _fernet(tuple(settings.STOCKROOM_ENCRYPTION_KEYS)).encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet(tuple(settings.STOCKROOM_ENCRYPTION_KEYS)).decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise ValueError(
            "A stored secret cannot be decrypted: is STOCKROOM_ENCRYPTION_KEYS missing the key it was written with?"
        ) from exc
