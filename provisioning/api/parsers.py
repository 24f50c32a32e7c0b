from rest_framework import parsers
from rest_framework.exceptions import ParseError


class MultiPartParser(parsers.MultiPartParser):
    """Refuses a multipart body without one named part instead of reading it as an empty form.

    RFC 2046 asks for at least one part. Django skips parts it cannot read, so a garbled body
    would otherwise create an instance of defaults.
    """

    def parse(self, stream, media_type=None, parser_context=None):
        parsed = super().parse(stream, media_type, parser_context)
        if not parsed.data and not parsed.files:
            raise ParseError("Expected at least one named part in the multipart body.")
        return parsed
