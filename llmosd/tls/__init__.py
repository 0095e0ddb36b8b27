"""TLS: the box's certificate (made, renewed, or the site's own) in ``certs``; the listener's context in
``server`` (which the client does not import: it pulls in the LAN probing)."""

from llmosd.tls.certs import CertError, Certificate, fingerprint, from_der, load_pair, self_signed

__all__ = ["CertError", "Certificate", "fingerprint", "from_der", "load_pair", "self_signed"]
