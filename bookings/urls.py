from django.urls import path

from bookings.apis import BookingCancelApi, BookingCollectionApi, BookingDetailApi

urlpatterns = [
    path("", BookingCollectionApi.as_view(), name="bookings"),
    path("<uuid:booking_id>/", BookingDetailApi.as_view(), name="booking-detail"),
    path("<uuid:booking_id>/cancel/", BookingCancelApi.as_view(), name="booking-cancel"),
]
