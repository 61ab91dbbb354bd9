from django.urls import path

from inventory.apis import ItemListApi

urlpatterns = [path("items/", ItemListApi.as_view(), name="inventory-items")]
