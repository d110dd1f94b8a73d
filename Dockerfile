# One image for every role: service replica, mock Node API, simulator, CLI.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY provisioner ./provisioner
COPY lua ./lua
# A home of its own, the working directory: the CLI run in the container writes its files
# there (`model export --out m.json`; /app is root's, and a review's export failed).
RUN pip install . && useradd --system --uid 10001 --create-home --home-dir /home/provisioner \
    provisioner

USER provisioner
WORKDIR /home/provisioner
EXPOSE 9100
ENTRYPOINT ["provisioner"]
CMD ["--help"]
