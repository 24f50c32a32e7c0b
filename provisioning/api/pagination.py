from django.core.paginator import Paginator
from django.db.models import QuerySet
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import PageNumberPagination


class IdsFirstPaginator(Paginator):
    """Finds a page's ids first, then loads just those rows.

    The ids come from the index alone, so a deep page skips index entries rather than whole
    rows (PostgreSQL otherwise reads every skipped row from the table). One more query per page,
    the same at every page size and depth. The first page skips nothing: its rows come at once.
    """

    def validate_number(self, number):
        if number in (1, "1") and self.allow_empty_first_page:
            return 1  # the first page always exists: no count is needed to say so
        return super().validate_number(number)

    def page(self, number):
        if not isinstance(self.object_list, QuerySet):
            return super().page(number)
        number = self.validate_number(number)
        if number == 1:
            # From the top nothing is skipped: load the rows at once. A first page that is not full
            # holds every row there is, so most lists (a user's few instances) need no count either.
            rows = list(self.object_list[: self.per_page + self.orphans])
            if len(rows) < self.per_page + self.orphans:
                self.count = len(rows)
            elif self.count > len(rows):
                rows = rows[: self.per_page]
            return self._get_page(rows, number, self)
        bottom = (number - 1) * self.per_page
        top = bottom + self.per_page
        if top + self.orphans >= self.count:
            top = self.count
        ids = list(self.object_list.values_list("pk", flat=True)[bottom:top])
        return self._get_page(list(self.object_list.filter(pk__in=ids)), number, self)


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


class Pagination(PageNumberPagination):
    page_size = 20
    page_size_query_param = "page_size"
    max_page_size = 100
    page_size_query_description = (
        f"Results per page, {page_size} unless given; a size above {max_page_size} gives {max_page_size}."
    )

    def get_page_number(self, request, paginator):
        """The page asked for, 1 unless given. Only one page number in plain digits is one: anything
        else ("", "last", "+1", a repeated page) is answered like a page that does not exist (404)."""
        values = request.query_params.getlist(self.page_query_param)
        if not values:
            return 1
        if len(values) > 1 or not _is_digits(values[0]):
            raise NotFound(self.invalid_page_message)
        return int(values[0])

    def get_page_size(self, request):
        """The page size asked for; one that is not a whole number from 1 up is refused (400), not ignored."""
        values = request.query_params.getlist(self.page_size_query_param)
        if not values:
            return self.page_size
        if len(values) > 1 or not _is_digits(values[0]) or int(values[0]) < 1:
            raise ValidationError({self.page_size_query_param: ["Expected one whole number from 1 up."]})
        return min(int(values[0]), self.max_page_size)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
        return parameters


class InstancePagination(Pagination):
    """For the long lists: instances, which a user or a CI system may have thousands of."""

    django_paginator_class = IdsFirstPaginator
