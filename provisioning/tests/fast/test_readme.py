from django.conf import settings

from provisioning.management.commands.options_table import options_markdown

README = settings.BASE_DIR / "README.md"


def test_the_readme_documents_the_current_options():
    text = README.read_text()
    documented = text.split("<!-- options-table -->\n", 1)[1].split("<!-- /options-table -->", 1)[0]
    assert documented == options_markdown(), "run `python manage.py options_table` and paste it into README.md"
