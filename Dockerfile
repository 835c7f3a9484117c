# The raftkv node image: FROM scratch, nothing to pull. Run tools/docker/build.sh first: it
# builds the statically linked binary on the host and stages it in tools/docker/stage/.
# What is inside: /raftkv, /etc/passwd and /etc/group naming the non-root user raftkv
# (10001:10001), and /data owned by that user (a named volume mounted there starts with that
# owner). No shell, no CA bundle: the nodes talk plain HTTP inside the compose networks, and a
# TLS setup names its own CA files (--peer-ca, --client-ca).
FROM scratch
COPY tools/docker/rootfs/ /
COPY tools/docker/stage/raftkv /raftkv
COPY --chown=10001:10001 tools/docker/stage/data/ /data/
USER 10001:10001
# Defaults for `serve`; compose (or `docker run -e`) sets the rest (RAFTKV_ID, RAFTKV_PEERS...).
ENV RAFTKV_DATA_DIR=/data \
    RAFTKV_CLIENT_ADDR=0.0.0.0:8001 \
    RAFTKV_PEER_ADDR=0.0.0.0:9001
VOLUME /data
# 8001: the HTTP client API; 9001: the peer transport.
EXPOSE 8001 9001
STOPSIGNAL SIGTERM
ENTRYPOINT ["/raftkv"]
CMD ["serve"]
