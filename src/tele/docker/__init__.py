"""Docker mode: finding the Docker Engine as the docker CLI does (`engine`), and running a
handler as a container with an engagement's environment, volumes and network (`run`)."""
