from django.core.paginator import Paginator
from django.db.models import QuerySet
from rest_framework.pagination import PageNumberPagination


class IdsFirstPaginator(Paginator):
    """Finds a page's ids first, then loads just those rows.

    The ids come from the index alone, so a deep page skips index entries rather than whole
    rows (PostgreSQL otherwise reads every skipped row from the table). One more query per page,
    the same at every page size and depth.
    """

    def page(self, number):
        if not isinstance(self.object_list, QuerySet):
            return super().page(number)
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        top = bottom + self.per_page
        if top + self.orphans >= self.count:
            top = self.count
        ids = list(self.object_list.values_list("pk", flat=True)[bottom:top])
        return self._get_page(list(self.object_list.filter(pk__in=ids)), number, self)


class Pagination(PageNumberPagination):
    page_size = 20
    page_size_query_param = "page_size"
    max_page_size = 100


class InstancePagination(Pagination):
    """For the long lists: instances, which a user or a CI system may have thousands of."""

    django_paginator_class = IdsFirstPaginator
