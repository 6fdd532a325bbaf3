"""The server's Prometheus metrics, served at GET /metrics (text format).

    ardir_http_requests_total{endpoint, method, status}   counter
    ardir_http_request_duration_seconds{endpoint}         histogram
    ardir_batch_images                                    histogram: images per model run
    ardir_images_total                                    counter: images classified
    ardir_queue_depth                                     gauge: requests waiting for the model
    ardir_shed_requests_total{reason}                     counter: refused to protect the server

`method` is one of METHODS, or "other": any token parses as a method, and each
would otherwise be a new series.

`endpoint` is the route's pattern (/v2/models/{model}/infer), not the path a
client sent, so a scan of random paths adds one series ("unmatched"), not one a
path. The mean merged batch over an interval is the change of
ardir_batch_images_sum over the change of ardir_batch_images_count.

Each server has a registry of its own (not prometheus_client's global one), so
several apps in one process, as in the tests, keep apart.
"""

import prometheus_client

# The methods counted under their own name; any other becomes "other".
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")
SHED_REASONS = ("overload", "connections", "body_timeout")

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self, queue_depth):
        """queue_depth: fn() -> the number of requests waiting for the model."""
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self.requests = prometheus_client.Counter(
            "ardir_http_requests", "HTTP requests answered, by endpoint, method and status.",
            ["endpoint", "method", "status"], registry=self.registry)
        self.latency = prometheus_client.Histogram(
            "ardir_http_request_duration_seconds", "Time from a request's arrival to its "
            "answer, by endpoint.", ["endpoint"], buckets=LATENCY_BUCKETS,
            registry=self.registry)
        self.batch = prometheus_client.Histogram(
            "ardir_batch_images", "Images per batch the model ran (merged from concurrent "
            "requests).", buckets=BATCH_BUCKETS, registry=self.registry)
        self.images = prometheus_client.Counter(
            "ardir_images", "Images the model classified.", registry=self.registry)
        self.queue = prometheus_client.Gauge(
            "ardir_queue_depth", "Requests waiting for the model.", registry=self.registry)
        self.queue.set_function(queue_depth)
        self.shed_requests = prometheus_client.Counter(
            "ardir_shed_requests", "Requests and connections refused to protect the "
            "server, by reason: overload (503: max_in_flight reached), connections (503: "
            "max_connections reached), body_timeout (408: the body came too slowly).",
            ["reason"], registry=self.registry)
        for reason in SHED_REASONS:  # every series from the start, at 0
            self.shed_requests.labels(reason)
        self._children = {}  # (endpoint, method, status) -> (counter, histogram)

    def observe_request(self, endpoint, method, status, seconds):
        method = method if method in METHODS else "other"  # any token parses as a method
        key = (endpoint, method, status)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and builds a key each call
            children = self._children[key] = (
                self.requests.labels(endpoint, method, str(status)),
                self.latency.labels(endpoint))
        children[0].inc()
        children[1].observe(seconds)

    def shed(self, reason):
        self.shed_requests.labels(reason).inc()

    def observe_batch(self, images):
        self.batch.observe(images)
        self.images.inc(images)

    def text(self):
        return prometheus_client.generate_latest(self.registry)
