# dicom-gateway: slim image, non-root, data on a volume.
# Build: docker build -t dicom-gateway .
# Run:   docker run -p 11112:11112 -v gw-data:/var/lib/dicom-gateway dicom-gateway
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/dicom-gateway --create-home gateway

WORKDIR /opt/dicom-gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir . \
    && mkdir -p /etc/dicom-gateway

COPY docker/gateway.yaml /etc/dicom-gateway/gateway.yaml

USER 10001:10001
VOLUME ["/var/lib/dicom-gateway"]
EXPOSE 11112
ENTRYPOINT ["dicom-gateway"]
CMD ["run", "-c", "/etc/dicom-gateway/gateway.yaml"]
